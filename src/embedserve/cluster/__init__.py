"""Work on a Ray cluster: joining one (or starting a local one), corpus jobs on Ray Data and batches
handed to the cluster. Ray is the `ray` extra: nothing here is imported unless a command asks for Ray."""
