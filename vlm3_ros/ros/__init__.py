"""ROS 2 glue: thin rclpy nodes around the pure core (the only package that imports rclpy).

Modules, by what they hold:

* :mod:`.depth_node`, :mod:`.odometry_node`, :mod:`.object_node`: the nodes (``main()`` runs one alone);
* :mod:`.params`: parameter tables, descriptors and validation;
* :mod:`.qos`: QoS profiles from parameters, input subscriptions (publisher matching on Humble);
* :mod:`.sync`: pairing of messages by stamp (tolerance, expiry, counters);
* :mod:`.worker`: one pending frame, newest wins, inference off the executor thread;
* :mod:`.conversions`: messages <-> arrays (``vlm3_ros.msg_codec``; cv_bridge when importable);
* :mod:`.tf`: TF publishing and the base_link -> camera extrinsic (tf2_ros when importable);
* :mod:`.diagnostics`: counters, rates and the /diagnostics status;
* :mod:`.backends`: backends created once per process and shared between nodes;
* :mod:`.detections`: vision_msgs detections in, Detection3DArray and markers out (object node);
* :mod:`.node_base`: what the nodes share (lifecycle, parameters, pairing, worker, diagnostics, warnings);
* :mod:`.runner`: running nodes in one process (console scripts, ``vlm3-ros perception``).
"""
