"""The source: ties trackers to the transport."""
