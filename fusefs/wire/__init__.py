"""Process-to-process messages: both ends of one protocol in one module."""
