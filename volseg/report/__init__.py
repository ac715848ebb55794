"""QC pictures (nilearn) and the cohort's HTML report."""
