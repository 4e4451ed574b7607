"""The model and everything that touches torch: loading, hooks, one forward and a partial
backward per batch, the CAM methods and faithfulness scores."""
