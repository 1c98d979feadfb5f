"""Training checkpoint -> files for inference and other tools; sits above `models/` and `checkpoint/`.

- `consolidate`: a step folder -> an fp32 inference folder (`mgpt4-consolidate`);
- `proj_file`: the trained projection as one file, the original MiniGPT-4 `.pth` or safetensors
  (`mgpt4-export`);
- `hf`: a transformers `Blip2ForConditionalGeneration` folder (`mgpt4-export --format hf`);
- `inference_config`: the `config.json` an exported folder or file carries for
  `mgpt4_dist.inference.load_model`, and `is_consolidated`.

Everything here reads a checkpoint through its engine-neutral trainable state
(`mgpt4_dist.checkpoint.state.TrainableState`): no process group, GPU or engine is needed.
"""
