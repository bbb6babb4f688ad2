"""msa-framework."""
