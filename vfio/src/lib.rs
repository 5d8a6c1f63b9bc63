//! VFIO migration uAPI v2 for `vfio-multifd`: real devices and simulated devices with real fds.
