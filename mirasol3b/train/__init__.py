"""Training: optimizer, sharded train state, the train step, and the loop."""
