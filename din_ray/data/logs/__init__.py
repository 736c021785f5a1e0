"""Impression + behaviour logs -> prepared DIN data, as a Ray Data pipeline. The entry point is
`din_ray.data.logs.pipeline.prepare_logs`, whose docstring maps the modules of this package."""
