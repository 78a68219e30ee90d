"""Static, self-contained HTML report of an audit run."""
