"""The Panel apps: live (follow and steer a training) and replay (scrub, compare, query recorded runs)."""
