"""``python -m oodforge.zoo check`` records each entry's accuracy on the first ID test images (the tests' check),
``python -m oodforge.zoo manifest`` rewrites the manifest; ``python -m oodforge.zoo verify`` checks
every entry's sha256 and prints its recorded accuracies; ``table`` prints them as markdown."""

from __future__ import annotations

import sys

from . import CHECK_IMAGES, manifest, record_check_accuracies, verify, write_manifest


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "verify"
    if cmd == "manifest":
        for name, rec in write_manifest().items():
            print(f"{name:<16} test acc {100 * (rec['id_test_accuracy'] or 0):6.2f} %  {rec['train_seconds']} s  "
                  f"{rec['sha256'][:12]}")
        return 0
    if cmd == "check":  # before `manifest`: the tests' accuracy check on the first CHECK_IMAGES test images
        for name, acc in record_check_accuracies().items():
            print(f"{name:<16} accuracy on the first {CHECK_IMAGES} ID test images {100 * acc:.2f} %")
        return 0
    if cmd == "verify":
        for name in manifest():
            rec = verify(name)
            print(f"{name:<16} ok  test acc {100 * rec['id_test_accuracy']:.2f} %  ({rec['command']})")
        return 0
    if cmd == "table":  # the markdown table of docs/results.md
        print("| entry | ID test acc | ID val acc | train time (s) | command |\n|---|---|---|---|---|")
        for name, rec in manifest().items():
            print(f"| {name} | {100 * rec['id_test_accuracy']:.2f} | {100 * rec['id_val_accuracy']:.2f} | "
                  f"{rec['train_seconds']:.0f} | `{rec['command']}` |")
        return 0
    print("usage: python -m oodforge.zoo [check|manifest|verify|table]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
