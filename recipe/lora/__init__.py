"""LoRA fine-tuning: the ``recipe.lora`` settings (config), putting adapters into a model (inject), and the PEFT
adapter format plus merging (adapter). The layer itself is plain model code: ``recipe.model.lora``."""
