"""Pure computation: arrays, tensors and tables in; arrays, tensors and tables out. Never imports Ray."""
