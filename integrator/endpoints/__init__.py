"""Device-facing endpoints: each knows its wire format and the pipeline, nothing else."""
