"""Command-line checkpoint converters: ``hf_to_ds.py`` (HF -> pipeline layer files) and ``ds_to_hf.py`` (back)."""
