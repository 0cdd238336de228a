"""Site side: the Flower ClientApp, stage trainers, site policy and privacy."""
