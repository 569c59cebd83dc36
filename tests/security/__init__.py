"""Attacks on what the node plugin and the webhook read from pods: each test is one attack, and says so."""
