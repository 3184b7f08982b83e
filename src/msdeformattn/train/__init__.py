"""Training and evaluation: data, matching, losses."""
