"""Change tracking: which blocks of a volume differ from what was last sent."""
