"""Similar cases: expand sources into series, index them (embeddings, region embeddings,
likelihoods) as Parquet, and search the index by text, by a scan or by an indexed series."""
