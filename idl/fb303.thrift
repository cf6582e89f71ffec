/*
 * fb303: the classic Facebook service-monitoring interface, in our own words.
 *
 * Wire-compatible with Apache Thrift's contrib/fb303/if/fb303.thrift: only method names, argument
 * field ids/types and the result's field 0 travel on the wire, so pubmon can poll any fb303 child
 * (classic or modern fb303_core BaseService) with this file, as long as transport and protocol
 * match. `oneway` replaces the old `async void` keyword, which thriftpy2 cannot parse.
 */

namespace py fb303
namespace cpp facebook.fb303
namespace java com.facebook.fb303.core

/** Common status reporting mechanism across all services. Travels as an i32. */
enum fb_status {
  DEAD = 0,
  STARTING = 1,
  ALIVE = 2,
  STOPPING = 3,
  STOPPED = 4,
  WARNING = 5,
}

/** Standard base service: identity, health, counters, options. */
service FacebookService {
  /** A descriptive name of the service. */
  string getName(),

  /** The version of the service. */
  string getVersion(),

  /** The status of this service. */
  fb_status getStatus(),

  /** A human-readable explanation of the status (why WARNING, why STARTING, ...). */
  string getStatusDetails(),

  /** All counters of the service. */
  map<string, i64> getCounters(),

  /** The value of one counter; 0 when it does not exist. */
  i64 getCounter(1: string key),

  /** Set an option. */
  void setOption(1: string key, 2: string value),

  /** The value of an option; "" when it is not set. */
  string getOption(1: string key),

  /** All options. */
  map<string, string> getOptions(),

  /**
   * A CPU profile over the next profileDurationInSec seconds (pprof format); "" when the service
   * does not profile.
   */
  string getCpuProfile(1: i32 profileDurationInSec),

  /** The unix time (seconds) at which the service started. */
  i64 aliveSince(),

  /** Ask the service to reload its configuration. Fire and forget. */
  oneway void reinitialize(),

  /** Ask the service to shut down. Fire and forget. */
  oneway void shutdown(),
}
