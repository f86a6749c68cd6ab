"""Small shared facts with no model knowledge: class names, image grids, files, runtime set-up, seeds."""
