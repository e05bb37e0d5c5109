"""Training side: XTuner data tools, config rendering, train / convert / merge, checkpoint
selection. Runs in its own environment (XTuner pins transformers 4.48) and never imports
`infer_engine`: the two sides meet only through files."""
