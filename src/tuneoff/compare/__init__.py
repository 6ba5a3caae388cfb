"""Comparing the arms of one experiment: the recommendation (``recommend``) and the HTML report (``report``)."""
