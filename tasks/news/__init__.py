"""The video-language news benchmark (ReutersViLNews-style): layout, stand-in, metrics, baselines."""
