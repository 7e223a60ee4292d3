"""Forge's backend.args: the settings the loader reads at load time."""

dynamic_args = dict(embedding_dir="./embeddings", emphasis_name="Original", forge_unet_storage_dtype=None,
                    online_lora=False)
