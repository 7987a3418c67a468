"""Hostile tests of issue 11 (storage interface for many processes): each one a defect found by trying."""
