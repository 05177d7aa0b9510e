"""The build's report: collect what the stages left, judge it, tabulate, plot, render.

  collect.py   read a build directory into one dict (dense, expert, builder side by side)
  verdict.py   the headline sentence against what a user would ship otherwise
  fmt.py       number formatting
  tables.py    the tables, shared by Markdown and HTML
  plots.py     PNG plots
  render.py    report.json, report.md, a self-contained report.html
"""
