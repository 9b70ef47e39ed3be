"""The studies and measurements of LEVI, run from the repository root as
`python -m experiments.<name>` (README.md in this folder lists them)."""
