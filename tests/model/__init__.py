"""The model-based test of the daemon: Hypothesis stateful testing against a real daemon."""
