"""Deployments of the HTTP server beyond one process: the Ray Serve application (`serve --ray`)."""
