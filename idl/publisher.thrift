/*
 * What a supervised publisher serves. pubmon probes it with fb303 getStatus and, once it is
 * healthy, calls startPublishers(data_source) when the publisher's config names a data source.
 */

include "fb303.thrift"

namespace py publisher

/** The publisher could not do what was asked; message says why. */
exception PublisherServiceException {
  1: string message,
}

service PublisherService extends fb303.FacebookService {
  /** Connect to the data source at dataSourceUrl and start publishing from it. */
  void startPublishers(1: string dataSourceUrl) throws (1: PublisherServiceException ex),
}
