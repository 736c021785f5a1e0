"""Raw logs -> prepared Parquet + schema + id counts (see `din_ray.data.format`)."""
