"""Fine-tuning and evaluation: GLUE and IMDB from posjax or Hugging Face checkpoints, and length
extrapolation of pretrained models."""
