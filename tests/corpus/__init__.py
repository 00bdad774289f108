"""Inputs nobody should send: malformed plans files and gateway answers, one file each."""
