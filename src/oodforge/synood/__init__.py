"""oodforge.synood"""
