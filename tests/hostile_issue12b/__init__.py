"""Hostile tests of issue 12 (second round): FileStorage.pack, DB.pack and the amberdb command."""
