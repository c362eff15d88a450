"""The offline paths: device bundles built from the registry (`sluice package`)
and batch scoring of files with the serving runtime (`sluice batch`)."""
