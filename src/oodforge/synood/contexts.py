"""Context labels of ID images from a vision-language model (SynOOD Eq. 3: ``p^con = phi(x^in, p^in)``).

A multimodal LLM lists the elements of an ID image *other than its main object* (for a "panda":
"bamboo, tourist, leaf, railing"). These contexts become the prompts of the regeneration step
(:mod:`oodforge.synood.generate`): ``"A photo only remain {contexts}."``.

The VLM is any ``transformers`` image-text-to-text model loaded with ``AutoProcessor`` +
``AutoModelForImageTextToText`` from a hub id (``llava-hf/llava-1.5-7b-hf``, ``Qwen/Qwen2-VL-7B-Instruct``)
or a local folder (CLI ``--vlm``). Users may instead bring their own contexts as JSONL.

File format (one JSON object per line, one line per source image)::

    {"index": 17, "label": 3, "class_name": "dress", "contexts": ["grass", "fence"], "raw": "grass, fence"}

``index`` is the position of the image in the labelled dataset; ``contexts`` may also be a single
string (it is split on commas). Writing is resumable: every line is written, flushed and fsync'ed as
soon as its image is labelled; a re-run skips the indices already present and repairs a torn last line
left by a kill (an incomplete line is dropped and its image labelled again).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..data.base import ArrayDataset
from ..hub import ModelUnavailableError
from .clip_model import load_pretrained, resolve_device, rgb_uint8_hwc

CONTEXT_PROMPT = ("List the elements in this image other than its main object, the {class_name}. "
                  "Answer with a short comma-separated list of nouns.")
VLM_OPTION_HELP = ("a vision-language model: pass --vlm with a hub id such as llava-hf/llava-1.5-7b-hf or "
                   "Qwen/Qwen2-VL-7B-Instruct, or a local folder saved with save_pretrained")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\d+[.)])\s*")


class ContextFileError(ValueError):
    """A contexts JSONL file is malformed."""


def parse_context_list(text: str, exclude: str | None = None, max_items: int = 12) -> list[str]:
    """Split a VLM answer into context phrases: commas/semicolons/newlines, bullets and numbering removed.

    The main object's name (``exclude``) and duplicates are dropped (case-insensitive).
    """
    items = []
    seen = {exclude.lower().strip()} if exclude else set()
    for part in re.split(r"[,;\n]+|\band\b", text):
        p = _BULLET.sub("", part).strip().strip(".:\"'").strip()
        if not p or p.lower() in seen:
            continue
        seen.add(p.lower())
        items.append(p)
        if len(items) >= max_items:
            break
    return items


def context_prompt(contexts: list[str] | str, max_chars: int = 73) -> str:
    """The regeneration prompt of the SynOOD reference code: ``"A photo only remain {contexts}."``.

    The context string is cut to ``max_chars`` characters (73 in the reference code) so the prompt fits
    CLIP's 77-token text encoder. An image without contexts (the VLM named nothing) gets "background".
    """
    text = (contexts if isinstance(contexts, str) else ", ".join(contexts))[:max_chars].strip()
    return f"A photo only remain {text or 'background'}."


# --- reading / writing -------------------------------------------------------------------------
def _parse_line(line: bytes, path: Path, lineno: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ContextFileError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be an object like "
                               '{"index": 0, "contexts": ["grass", "fence"]}') from None
    if not isinstance(obj, dict) or "index" not in obj or "contexts" not in obj:
        raise ContextFileError(f"{path}:{lineno}: each line needs an 'index' (image position) and 'contexts' "
                               "(a list of phrases or a comma-separated string)")
    c = obj["contexts"]
    if isinstance(c, str):
        obj["contexts"] = parse_context_list(c)
    elif isinstance(c, list) and all(isinstance(s, str) for s in c):
        obj["contexts"] = [s.strip() for s in c if s.strip()]
    else:
        raise ContextFileError(f"{path}:{lineno}: 'contexts' must be a list of strings or a string")
    obj["index"] = int(obj["index"])
    return obj


def _scan(path: Path) -> tuple[dict[int, dict], int, bool]:
    """Parsed entries, the byte length of the valid prefix, and whether that prefix lacks its final newline.

    A last line that is not valid JSON is a write cut short by a kill: it is not part of the valid
    prefix. A complete last line without a newline (hand-written files) is kept.
    """
    data = path.read_bytes() if path.is_file() else b""
    entries: dict[int, dict] = {}
    pos, lineno = 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        lineno += 1
        last = nl < 0
        chunk = data[pos:] if last else data[pos:nl]
        if chunk.strip():
            try:
                obj = _parse_line(chunk, path, lineno)
            except ContextFileError:
                if last:
                    return entries, pos, False
                raise
            entries[obj["index"]] = obj
        if last:
            return entries, len(data), True
        pos = nl + 1
    return entries, pos, False


def read_contexts(path: str | os.PathLike) -> dict[int, list[str]]:
    """``{index: [context, ...]}`` from a contexts JSONL file (a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"contexts file {path} does not exist; make it with `oodforge contexts` "
                                "or write JSONL lines like {\"index\": 0, \"contexts\": [\"grass\"]}")
    entries, _, _ = _scan(path)
    return {i: e["contexts"] for i, e in entries.items()}


class ContextWriter:
    """Append-only, crash-safe JSONL writer (resumes: repairs a torn tail, reports the done indices)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entries, valid, needs_newline = _scan(self.path)
        if self.path.is_file() and self.path.stat().st_size != valid:
            with open(self.path, "r+b") as f:  # drop the torn tail of a killed run
                f.truncate(valid)
                f.flush()
                os.fsync(f.fileno())
        self.done = set(entries)
        self._f = open(self.path, "ab")
        if needs_newline:
            self._f.write(b"\n")

    def write(self, record: dict) -> None:
        if int(record["index"]) in self.done:
            raise ContextFileError(f"{self.path}: index {record['index']} is already labelled")
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.add(int(record["index"]))

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ContextWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- the VLM -----------------------------------------------------------------------------------
class ContextLabeller:
    """A VLM that answers :data:`CONTEXT_PROMPT` for batches of images (greedy decoding, deterministic)."""

    def __init__(self, vlm: str | os.PathLike | None, device: str | torch.device = "cpu",
                 prompt: str = CONTEXT_PROMPT, max_new_tokens: int = 48):
        if vlm is None or str(vlm).strip() == "":
            raise ModelUnavailableError(f"context labelling needs {VLM_OPTION_HELP}")
        self.device = resolve_device(device)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = load_pretrained(AutoProcessor, vlm, "context labelling: VLM processor", "--vlm")
        self.model = load_pretrained(AutoModelForImageTextToText, vlm, "context labelling: VLM", "--vlm",
                                     dtype=dtype).to(self.device).eval()
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # decoder-only generation needs left padding in a batch
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        self.name = str(vlm)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    def _text(self, class_name: str) -> str:
        question = self.prompt.format(class_name=class_name)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        image_token = getattr(self.processor, "image_token", "<image>")
        return f"{image_token}\n{question}\n"

    @torch.no_grad()
    def answer(self, images: np.ndarray | torch.Tensor, class_names: list[str]) -> list[str]:
        """Raw answers for uint8 ``[N, C, H, W]`` images whose main objects are ``class_names``."""
        from PIL import Image

        pil = [Image.fromarray(a) for a in rgb_uint8_hwc(images)]
        texts = [self._text(c) for c in class_names]
        inputs = self.processor(images=pil, text=texts, return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device, self.model.dtype) if torch.is_floating_point(v) else v.to(self.device))
                  for k, v in inputs.items()}
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [s.strip() for s in self.processor.batch_decode(new, skip_special_tokens=True)]


def label_contexts(
    dataset: ArrayDataset,
    out: str | os.PathLike,
    labeller: ContextLabeller,
    class_names: list[str] | None = None,
    indices: np.ndarray | list[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[int, list[str]]:
    """Label the contexts of ``dataset[indices]`` into the JSONL file ``out`` (resumable; see module doc).

    Returns ``{index: contexts}`` for all indices now in the file.
    """
    names = class_names or dataset.class_names
    if not names:
        raise ValueError("label_contexts needs the class names (dataset.class_names or class_names=...)")
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    from ..progress import progress_bar

    with ContextWriter(out) as w:
        todo = [int(i) for i in idx if int(i) not in w.done]
        bar = progress_bar(total=len(todo), desc="contexts", unit="img", disable=not progress)
        for b in range(0, len(todo), batch_size):
            chunk = todo[b:b + batch_size]
            labels = dataset.labels[chunk].tolist()
            cls = [names[y] if 0 <= y < len(names) else "object" for y in labels]
            answers = labeller.answer(dataset.images[chunk], cls)
            for i, y, c, a in zip(chunk, labels, cls, answers):
                w.write({"index": i, "label": int(y), "class_name": c, "contexts": parse_context_list(a, c),
                         "raw": a, "vlm": labeller.name})
            bar.update(len(chunk))
        bar.close()
    return read_contexts(out)


__all__ = ["CONTEXT_PROMPT", "ContextLabeller", "ContextWriter", "ContextFileError", "label_contexts",
           "read_contexts", "parse_context_list", "context_prompt"]
