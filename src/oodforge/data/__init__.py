"""oodforge.data"""
