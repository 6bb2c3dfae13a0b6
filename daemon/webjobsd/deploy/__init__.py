"""Deployments: how a whole site, or one job, arrives in wwwroot (KUDU-DEPLOY.md Part A #1).

This stage owns the deployment records, the site-wide deployment lock, the sync into wwwroot,
the staging of job folders swapped in whole, and the sources (a zip, a OneDeploy artifact, a git
push, a dropped zip). The API only maps routes onto it. The jobs side never hears from it
directly: it learns of a deployment through the file system and the deployment lock
(`SiteLayout.deployments_lock_path`), which it reads as "deployment in progress".
"""
