"""Analysis helpers behind ``tools/analysis``."""
