"""Pages that combine pipelines, runs and triggers (the highest app they need): one
module per page."""
