"""Using a trained model: loading any checkpoint form for inference (``loading``), ai2d-style multiple-choice
scoring as lmms-eval does it (``ai2d``). The command lines are ``recipe.evaluate`` and ``recipe.chat``; decoding
itself is ``recipe.model.generation``. See ``docs/evaluate.md``."""
