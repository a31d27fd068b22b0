"""oodforge.synth"""
