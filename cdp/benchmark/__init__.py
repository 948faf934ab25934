"""`cdp bench` and the demo's machinery: generated images, real daemons, measurements."""
