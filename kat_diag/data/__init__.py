"""Problems and where they come from: the record every data source becomes, loaders, answer checking.

Modules: `problems` (`Problem`, the world's JSONL format), `sources` (local JSONL / Parquet,
`datasets` directories, `hf:` names, with a field mapping; preflight of a data file), `grading`
(exact match in the world, math-verify on real data).

May import: nothing else of kat_diag (a bottom layer).
"""
