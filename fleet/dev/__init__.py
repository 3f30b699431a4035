"""Tools for trying the product, apart from it: the demo, the device simulator, a local broker, fake hardware trees."""
