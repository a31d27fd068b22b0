"""oodforge.ssod"""
