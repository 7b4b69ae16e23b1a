"""How the model is cut and spread over DeepSpeed's pipeline, expert-parallel and data-parallel groups."""
