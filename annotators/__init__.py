"""Control maps from pictures. Offline, weight-free annotators live in classical.py, skeleton drawing in pose.py;
registry.py lists them as data for the nodes and the training data pipeline."""
