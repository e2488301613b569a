"""`qconvert report`: what a conversion's report.json holds, drawn as a self-contained HTML page."""
