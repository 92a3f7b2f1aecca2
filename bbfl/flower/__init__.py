"""bbfl's federated methods on Flower's Deployment Engine: the ServerApp + ClientApp (:mod:`bbfl.flower.app`)
and a real deployment on one machine for trying it and for the tests (:mod:`bbfl.flower.local`).

This sits above the methods, not inside :mod:`bbfl.federation`: both apps rebuild a run's method from its
``config.json`` (:func:`bbfl.methods.registry.build_federated_method`), so they import the method layer;
the engine they drive (:mod:`bbfl.federation.engine`) imports no method.
"""
